# Sourced by the other scripts: installs what the build needs on a fresh machine.
# Pingora's zlib-ng build needs cmake; everything else comes from crates.io.
if ! command -v cmake >/dev/null 2>&1; then
  echo "installing cmake (needed to build Pingora)..." >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq cmake >/dev/null
fi
# Where cargo puts what it builds: CARGO_TARGET_DIR when set, else target/.
target_dir=${CARGO_TARGET_DIR:-target}
