#!/usr/bin/env bash
# The paper's Table 1 on one dataset: the baseline U-Net (BCE), composite (BCE + lambda PEL), PEL
# alone, and the baseline fine-tuned with PEL for one epoch, trained from the same seed with
# equal budgets, then evaluated on the novel-view and novel-subject splits.
#
#   scripts/table1.sh DATA OUT [EPOCHS] [BATCH]      -> OUT/table1.md
#
# FLUOROPOSE names the binary (default: fluoropose on PATH; a `cuda` build trains on the GPU).
# A model that diverges gets "DIV" in the table, as in the paper.
set -uo pipefail
if [ $# -lt 2 ]; then
    sed -n 2,9p "$0"
    exit 2
fi
data=$1 out=$2 epochs=${3:-3} batch=${4:-16}
bin=${FLUOROPOSE:-fluoropose}
mkdir -p "$out"

fit() { # name, then train arguments
    local name=$1
    shift
    "$bin" train --data "$data" --batch "$batch" --out "$out/$name.safetensors" "$@" ||
        echo "$name: training stopped (see above)"
}
fit baseline --mode baseline --epochs "$epochs" --lr 1e-3
fit composite --mode composite --epochs "$epochs" --lr 1e-3 --lambda 0.01
fit pel-only --mode pel-only --epochs 1 --lr 1e-3
[ -f "$out/baseline.safetensors" ] &&
    fit finetuned --mode finetune --epochs 1 --lr 1e-4 --init "$out/baseline.safetensors"

table=$out/table1.md
: >"$table"
# The paper's argmax first, then (beyond the paper) the same weights read as the app reads them.
for how in "" "--mirror --decode consistent"; do
    for split in novel-view novel-subject; do
        for m in baseline composite pel-only finetuned; do
            # shellcheck disable=SC2086 # $how is a list of flags
            if [ -f "$out/$m.safetensors" ] &&
                "$bin" eval --model "$out/$m.safetensors" --data "$data" --split "$split" \
                    $how --table "$out/.row.md" >/dev/null; then
                [ -s "$table" ] || head -2 "$out/.row.md" >>"$table"
                tail -1 "$out/.row.md" >>"$table"
            else
                echo "| $m${how:+ ($how)} | $split | DIV |" >>"$table"
            fi
        done
    done
done
rm -f "$out/.row.md"
cat "$table"
