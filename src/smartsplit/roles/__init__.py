"""The roles of a round: the central server, an edge server and a device, as objects that exchange ``smartsplit.messages``."""
