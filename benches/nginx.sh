# Sourced by the benchmark scripts that run nginx: installs it (apt) when missing and
# exports NGINX, its path.
if ! command -v nginx >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx >/dev/null
fi
NGINX="$(command -v nginx)"
export NGINX
