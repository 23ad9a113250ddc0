#!/usr/bin/env bash
# Stop 30's training run on a lent GPU machine (models/README.md, "More phantoms on a GPU"):
# a BCE run of the shipped network on d45 plus 400 phantoms no earlier step saw (480-879, 15
# views each), then step 8's finish (the composite loss for one d45 epoch), both keeping a moving
# average of the weights (`train --ema`). Time-boxed: the BCE steps are sized from a short probe
# so that everything ends within BUDGET seconds.
#
# Here (a machine with no GPU), once:
#   scripts/build-cuda.sh && strip -o /tmp/fp "$CARGO_TARGET_DIR/release/fluoropose" &&
#     mkdir -p .gpu && xz -T0 -6 -c /tmp/fp > .gpu/fluoropose.xz && cp scripts/gpu-train.sh .gpu/run.sh
#   and the Vulkan loader debs in .gl (scripts/gpu-window.sh pack does both .gl and the build);
# there, with .gl and .gpu carried:  bash .gpu/run.sh   ($OUT gets log.txt, n1.tar and n1f.tar).
# Locally, with a CPU build and tiny sizes, the same script is a dry run:
#   F=target/release/fluoropose W=/tmp/w OUT=/tmp/o BUDGET=200 D45_SUBJ=1..3 D45_HELD=1 \
#     D45_VIEWS=4 D45_NV=1 NEW_PER=2 NEW_PARTS=2 NEW_VIEWS=4 PROBE=6 FSTEPS=3 GEN_S=60 scripts/gpu-train.sh
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-540}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L=$OUT/log.txt
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "== +$(( $(date +%s) - T0 ))s $*" | tee -a "$L"; }
W=${W:-/tmp/w}; mkdir -p "$W"
if [ -z "${F:-}" ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
    NV=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))")
    export LD_LIBRARY_PATH=$NV:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json WGPU_BACKEND=vulkan
    F=/tmp/fp
    python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/fluoropose.xz'), open('$F','wb'))"; chmod +x $F
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$L" 2>&1
fi
NEW_FIRST=${NEW_FIRST:-480}; NEW_PER=${NEW_PER:-100}; NEW_PARTS=${NEW_PARTS:-4}; NEW_VIEWS=${NEW_VIEWS:-15}
D45_SUBJ=${D45_SUBJ:-1..64}; D45_HELD=${D45_HELD:-4}; D45_VIEWS=${D45_VIEWS:-100}; D45_NV=${D45_NV:-10}
GEN_S=${GEN_S:-150}
R="--photons 10000 --gamma 0.3 --blur 0.5 --max-rotation-deg 45"
log "datasets (at most ${GEN_S}s)"
timeout $GEN_S $F dataset --ct phantom:$D45_SUBJ --held-out $D45_HELD --views $D45_VIEWS \
    --novel-views $D45_NV --size 256 $R --out $W/d45 > $W/gen-d45.txt 2>&1 &
for i in $(seq 0 $((NEW_PARTS - 1))); do
    a=$((NEW_FIRST + i * NEW_PER)); b=$((a + NEW_PER - 1))
    timeout $GEN_S $F dataset --ct phantom:$a..$b --views $NEW_VIEWS --novel-views 0 --size 256 \
        $R --seed $((20 + i)) --out $W/n$i > $W/gen-n$i.txt 2>&1 &
done
wait
for g in $W/gen-*.txt; do echo "$(basename $g): $(tail -c 300 $g | tr '\r' '\n' | tail -2 | tr '\n' ' ')" >> "$L"; done
NEW=(); for i in $(seq 0 $((NEW_PARTS - 1))); do
    n=$(wc -l < $W/n$i/labels.jsonl 2>/dev/null || echo 0); echo "n$i: $n images" >> "$L"
    [ "$n" -gt 0 ] && NEW+=(--data $W/n$i)
done
echo "d45: $(wc -l < $W/d45/labels.jsonl) images" >> "$L"
ips() { # images/s of a metrics log: the median of its steps after the first five
    python3 -c "import json,sys,statistics as s; v=[json.loads(l)['images_per_s'] for l in open(sys.argv[1])]; v=v[min(5,max(len(v)-1,0)):]; print(max(s.median(v),1.0) if v else 40.0)" "$1" 2>/dev/null || echo 40.0
}
PROBE=${PROBE:-15}
log "probe: $PROBE BCE steps"
$F train --data $W/d45 "${NEW[@]}" --mode baseline --init models/default.safetensors --epochs 3 \
    --batch 16 --lr 3e-5 --mirror 0.5 --max-steps $PROBE --out $W/probe.safetensors > $W/probe.txt 2>&1
RATE=$(ips $W/probe.metrics.jsonl); echo "BCE images/s: $RATE" >> "$L"
FSTEPS=${FSTEPS:-375}
# The composite steps ran at 0.8 of the BCE rate on the GPU before (108 against 135 images/s).
FIN_S=$(python3 -c "print(int($FSTEPS * 16 / (0.75 * max($RATE, 1e-3))) + 30)")
BCE_S=$(( $(left) - FIN_S - 40 ))
echo "finish budget ${FIN_S}s, BCE ${BCE_S}s" >> "$L"
STEPS=$(python3 -c "print(max(20, int($BCE_S * $RATE * 0.93 / 16)))")
log "BCE: $STEPS steps in ${BCE_S}s"
timeout $(( BCE_S + 60 )) $F train --data $W/d45 "${NEW[@]}" --mode baseline --init models/default.safetensors \
    --epochs 3 --batch 16 --lr 3e-5 --cosine --mirror 0.5 --ema 0.998 --max-steps $STEPS \
    --out $W/n1.safetensors > $W/bce.txt 2>&1
tail -c 400 $W/bce.txt | tr '\r' '\n' | tail -3 >> "$L"
log "finish: composite on d45"
timeout $(( $(left) - 15 )) $F train --data $W/d45 --mode composite --init $W/n1.safetensors --epochs 1 \
    --batch 16 --lr 3e-5 --lambda 0.003 --ema 0.99 --max-steps $FSTEPS --out $W/n1f.safetensors > $W/fin.txt 2>&1
tail -c 400 $W/fin.txt | tr '\r' '\n' | tail -3 >> "$L"
log "pack"
for n in n1 n1f; do
    ls $W/$n.* >> "$L" 2>&1
    (cd $W && tar cf $OUT/$n.tar $n.safetensors $n.json $n.ema.safetensors $n.ema.json $n.metrics.jsonl 2>> "$L")
done
tail -n 3 $W/probe.metrics.jsonl >> "$L" 2>/dev/null
log done
