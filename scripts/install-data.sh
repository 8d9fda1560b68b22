#!/usr/bin/env bash
# Make sure Fashion-MNIST's four IDX files are present; install Debian's package when we can.
set -euo pipefail
root="${1:-/usr/share/datasets/fashion-mnist}"
if ls "$root"/train-images-idx3-ubyte* >/dev/null 2>&1 && ls "$root"/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
cat >&2 <<MSG
Fashion-MNIST is not in $root.
  On Debian/Ubuntu:  sudo apt-get install dataset-fashion-mnist
  Elsewhere: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
  t10k-labels-idx1-ubyte.gz in a folder and pass it with --set data.root=/that/folder
MSG
exit 1
