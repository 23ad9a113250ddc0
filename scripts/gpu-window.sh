#!/usr/bin/env bash
# The desktop app in a real X window on a GPU machine without a display (the lent H100/H200):
# its 60 fps with a window (issue 7). Two steps:
#
#   scripts/gpu-window.sh pack   # here (Debian 12 with xvfb, mesa-vulkan-drivers, a cuda build):
#                                # fills .gl, .x11 and .gpu (git-ignored through .git/info/exclude)
#   scripts/gpu-window.sh run    # there, with .gl .x11 .gpu carried; $OUT gets log.txt, err.txt
#                                # and a screenshot per run
#
# What the GPU machine lacks, and so what `pack` carries:
# - an X server: Xvfb, xkbcomp, the xkb data and their libraries, taken from this machine;
# - GLX in that server (NVIDIA's Vulkan driver segfaults creating a surface on an X server without
#   GLX): Mesa's swrast_dri.so and its libraries. LLVM and libxml2 name libz3 and libicudata,
#   which nothing here calls: they are stubs, which keeps the call under its 64 MiB;
# - a Vulkan driver that can present there: NVIDIA's driver reports no present modes for an Xvfb
#   surface (no DRI3), so the window presents through lavapipe, while the U-Net runs on CUDA and
#   the stream's and the refinement's DRRs on the NVIDIA adapter (headless, `drr::gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."

pack() {
    grep -qxF /.gl/ .git/info/exclude || printf '/.gl/\n/.x11/\n/.gpu/\n' >> .git/info/exclude
    mkdir -p .gl .x11 .gpu /tmp/amd64/partial
    local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    apt-get $o update -q
    (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    local t; t=$(mktemp -d)
    copy_libs() { # destination, then binaries whose libraries (but the C and C++ runtimes) to copy
        local d=$1; shift
        for f in $(ldd "$@" | awk '/=>/{print $3}' | sort -u); do
            case $(basename "$f") in libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libpthread*) ;;
                *) [ -e "$d/$(basename "$f")" ] || cp -L "$f" "$d/" ;; esac
        done
    }
    # Xvfb, and the X client libraries winit opens at run time.
    mkdir -p "$t/x/bin" "$t/x/lib"
    cp /usr/bin/Xvfb /usr/bin/xkbcomp "$t/x/bin/"
    cp -r /usr/share/X11/xkb "$t/x/xkb"
    copy_libs "$t/x/lib" /usr/bin/Xvfb /usr/bin/xkbcomp
    for n in libX11.so.6 libX11-xcb.so.1 libXcursor.so.1 libXrandr.so.2 libXi.so.6 \
        libxkbcommon.so.0 libxkbcommon-x11.so.0 libxcb.so.1 libXext.so.6 libXrender.so.1 \
        libXfixes.so.3 libxcb-glx.so.0 libxcb-xkb.so.1 libxcb-randr.so.0 libxcb-xfixes.so.0 \
        libxcb-shm.so.0 libxcb-present.so.0 libxcb-dri3.so.0 libxcb-sync.so.1 libxshmfence.so.1 \
        libxcb-render.so.0 libXau.so.6 libXdmcp.so.6 libvulkan.so.1; do
        cp -L "/lib/x86_64-linux-gnu/$n" "$t/x/lib/"
    done
    tar czf .x11/x11.tgz -C "$t/x" .
    # Mesa: software GLX for Xvfb, lavapipe for the window.
    mkdir -p "$t/m/dri" "$t/m/lib"
    cp -L /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so "$t/m/dri/"
    cp -L /usr/lib/x86_64-linux-gnu/libvulkan_lvp.so "$t/m/lib/"
    copy_libs "$t/m/lib" "$t/m/dri/swrast_dri.so" "$t/m/lib/libvulkan_lvp.so"
    nm -D "$t/m/lib/libLLVM-15.so.1" | awk '$1=="U" && $2 ~ /^Z3_/ {print "void "$2"(void){}"}' > "$t/z3.c"
    cc -shared -fPIC -o "$t/m/lib/libz3.so.4" -Wl,-soname,libz3.so.4 "$t/z3.c"
    echo 'const char icudt72_dat[64] __attribute__((aligned(16))) = {0};' > "$t/icu.c"
    cc -shared -fPIC -o "$t/m/lib/libicudata.so.72" -Wl,-soname,libicudata.so.72 "$t/icu.c"
    printf '{"file_format_version":"1.0.0","ICD":{"library_path":"/tmp/m/lib/libvulkan_lvp.so","api_version":"1.1.230"}}\n' \
        > "$t/m/lvp_icd.json"
    tar cf - -C "$t/m" . | xz -T0 -9 > .x11/mesa.txz
    # The app, a cuda build, stripped.
    scripts/build-cuda.sh
    cp "${CARGO_TARGET_DIR:-target}/release/fluoropose" "$t/fp"
    strip "$t/fp"
    xz -T0 -6 -c "$t/fp" > .gpu/fluoropose.xz
    rm -rf "$t"
    du -ch .gl .x11 .gpu | tail -1
}

run() {
set +e
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L=$OUT/log.txt
log() { echo "== $(date +%T) $*" | tee -a "$L"; }
log setup
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
X=/tmp/x; mkdir -p $X/fb; tar xzf .x11/x11.tgz -C $X
# Mesa's software GLX for Xvfb (NVIDIA's Vulkan WSI segfaults on an X server without GLX); the
# libz3 and libicudata in it are stubs (LLVM and libxml2 name them, nothing here calls them).
M=/tmp/m; python3 -c "import tarfile; tarfile.open('.x11/mesa.txz').extractall('$M')"
D=/usr/lib/x86_64-linux-gnu/dri; mkdir -p $D; [ -e $D/swrast_dri.so ] || ln -s $M/dri/swrast_dri.so $D/
# The app takes from the bundles only the libraries this image lacks.
for l in $X/lib/* $M/lib/*; do n=$(basename "$l"); ldconfig -p | awk '{print $1}' | grep -qxF "$n" || ln -sf "$l" $X/fb/; done
echo "from the bundle: $(ls $X/fb | tr '\n' ' ')" >> "$L"
[ -x /usr/bin/xkbcomp ] || ln -s $X/bin/xkbcomp /usr/bin/xkbcomp
mkdir -p /var/lib/xkb /usr/share/X11; [ -e /usr/share/X11/xkb ] || ln -s $X/xkb /usr/share/X11/xkb
export XKB_CONFIG_ROOT=$X/xkb
NV=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))")
export LD_LIBRARY_PATH=$NV:/usr/local/nvidia/lib64:$X/fb:${LD_LIBRARY_PATH:-}
# NVIDIA's Vulkan driver cannot present to Xvfb (no DRI3: the surface's present modes fail), so
# the window presents through lavapipe while the headless renderers take the NVIDIA adapter.
J=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export VK_DRIVER_FILES=$J:$M/lvp_icd.json
F=${F:-/tmp/fp}
[ -x "$F" ] || { python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/fluoropose.xz'), open('$F','wb'))"; chmod +x $F; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$L" 2>&1
nproc >> "$L"
LD_LIBRARY_PATH=$M/lib:$X/lib $X/bin/Xvfb :99 -screen 0 1600x1000x24 -xkbdir $X/xkb -nolisten tcp \
    > "$OUT/xvfb.txt" 2>&1 &
sleep 2
export DISPLAY=:99
echo "Xvfb extensions: $(LD_LIBRARY_PATH=$X/lib python3 -c "import ctypes;x=ctypes.CDLL('libX11.so.6');x.XOpenDisplay.restype=ctypes.c_void_p;d=x.XOpenDisplay(b':99');n=ctypes.c_int();x.XListExtensions.restype=ctypes.POINTER(ctypes.c_char_p);l=x.XListExtensions(ctypes.c_void_p(d),ctypes.byref(n));print(b' '.join(l[i] for i in range(n.value)).decode())")" >> "$L"
mkdir -p -m 700 /tmp/xdg; export XDG_RUNTIME_DIR=/tmp/xdg
export RUST_LOG=warn,egui_wgpu=info,eframe=info
app() { # name, then the app's arguments
    local n=$1; shift
    log "app $n: $*"
    timeout 60 $F --screenshot "$OUT/$n.png" "$@" >> "$L" 2> /tmp/err.txt
    echo "rc $?" >> "$L"
    { echo "--- $n"; grep -v XDG_RUNTIME /tmp/err.txt | tail -c 3000; } >> "$OUT/err.txt"
}
# wgpu's EGL backend panicked at instance creation there (NVIDIA's EGL): Vulkan alone.
export WGPU_BACKEND=vulkan
# The first CUDA run on a fresh machine JIT-compiles candle's PTX kernels (seconds): warm up.
app warmup --fps 60 --frames 600 --refine off
app live60 --fps 60 --frames 1800 --refine off
app live60nv --fps 60 --frames 1800 --refine off --no-vsync
app refine60 --fps 60 --frames 1800 --refine always
app live120nv --fps 120 --frames 1800 --refine off --no-vsync
log "bench pipeline (no window)"
timeout 30 $F bench pipeline --seconds 10 --fps 60 --json >> "$L" 2>> /tmp/err_bench.txt
log "bench refine"
timeout 60 $F bench refine --json >> "$L" 2>> /tmp/err_bench.txt
{ echo "--- bench"; tail -c 3000 /tmp/err_bench.txt; } >> "$OUT/err.txt"
log done
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
