#!/usr/bin/env bash
# Regenerate the gRPC modules from src/smartsplit/deploy/smartsplit.proto (needs grpcio-tools; the
# generated files are checked in, so installing SmartSplit never needs it).
set -euo pipefail
cd "$(dirname "$0")/../src"
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. smartsplit/deploy/smartsplit.proto
