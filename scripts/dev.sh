#!/usr/bin/env bash
# Set up napari-medseg in ./.venv (idempotent) and run it.
#
#   bash scripts/dev.sh demo [napari-medseg view options]   napari with the sample CT and the docks
#   bash scripts/dev.sh test [pytest options]               the whole test suite, headless
#
# As root on a fresh Debian/Ubuntu machine it installs the system libraries
# that Qt and a virtual X server need (apt-get); elsewhere it says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3-venv xvfb xauth
    libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0
    libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
    libxcb-shape0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 libxcb-cursor0 libxcb-xkb1
    libx11-xcb1 libxrender1 libxi6
)

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup_apt() {
    command -v dpkg-query >/dev/null 2>&1 || return 0
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        log "missing system packages (install them with your package manager): ${missing[*]}"
    fi
}

setup_python() {
    local extras=$1
    local py=${PYTHON:-}
    if [ -z "$py" ]; then
        for c in python3.11 python3.12 python3.10 python3; do
            command -v "$c" >/dev/null 2>&1 && { py=$c; break; }
        done
    fi
    local stamp=".venv/.medseg-installed-$extras"
    local want
    want=$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-16)
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    [ -x .venv/bin/python ] || { log "creating .venv with $py"; "$py" -m venv .venv; }
    log "installing napari-medseg[$extras] (torch pinned by constraints.txt)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
    if [ "$extras" = test ]; then
        # sam2 ships only as source and its build needs torch: build it against ours
        # (an isolated build would fetch the newest CUDA torch), without its CUDA kernels
        log "installing sam2 (source build against the pinned torch)"
        .venv/bin/python -m pip install -q -c constraints.txt "setuptools>=77" wheel
        SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation \
            -c constraints.txt -e ".[sam2]"
    fi
    echo "$want" > "$stamp"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    demo)
        setup_apt
        setup_python "qt"
        if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
            log "no display found: running on a virtual screen, saving a screenshot to demo.png"
            exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/napari-medseg view \
                --sample abdomen-ct --screenshot demo.png "$@"
        fi
        exec .venv/bin/napari-medseg view --sample abdomen-ct "$@"
        ;;
    test)
        setup_apt
        setup_python "test"
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        sed -n '2,8p' "$0"
        exit 2
        ;;
esac
