#!/usr/bin/env bash
# GPU recipe: a tiny policy that reads the hazard from its camera image (docs/DESIGN.md,
# "Data"). Trains SRD-RL on SCENES generated scenes (seed 0, 30% label noise), then
# evaluates it with the reasoning it generates itself on TEST scenes drawn with another
# generator seed (1), which training never saw, with the image ablation (a hazard-free road,
# shuffled frames) beside it. Nothing here is chosen on the test scenes.
#
#   bash benchmarks/seeing_recipe.sh                 # writes under $OUT/seeing_recipe
#   SCENES=2000 EPOCHS=4 bash benchmarks/seeing_recipe.sh
#
# Prints the generated-reasoning accuracy (hazard side on scenes with a hazard in the way
# to one side, hazard kind, manoeuvre) and the in-path crossing rate, with the camera's
# frames and with each ablation; the whole report is $RUN/eval/eval_report.json.
set -euo pipefail
OUT="${OUT:-bench_out}"
RUN="${RUN:-$OUT/seeing_recipe}"
SCENES="${SCENES:-4000}"
TEST_SCENES="${TEST_SCENES:-600}"
EPOCHS="${EPOCHS:-4}"
BATCH="${BATCH:-16}"

start=$(date +%s)
# data already written by an earlier call of this script are kept
[ -f "$RUN/data/val.jsonl" ] ||
    srdrl-make-data --output_dir "$RUN/data" --num_scenes "$SCENES" --seed 0 --label_noise 0.3
[ -f "$RUN/test/val.jsonl" ] ||
    srdrl-make-data --output_dir "$RUN/test" --num_scenes "$TEST_SCENES" --seed 1 \
        --label_noise 0.3 --val_fraction 0.01
made=$(date +%s)
srdrl-train --data_path "$RUN/data/train.jsonl" --eval_data_path "$RUN/data/val.jsonl" \
    --output_dir "$RUN/run" --overwrite_output_dir --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH" --logging_steps 50 --eval_samples 0
trained=$(date +%s)
srdrl-eval --policy "$RUN/run/policy" --data_path "$RUN/test/train.jsonl" \
    --output_dir "$RUN/eval" --reasoning_modes generated oracle --num_seeds 3 --pictures 4 \
    --batch_size 32
done_at=$(date +%s)
python3 - "$RUN/eval/eval_report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))["evaluation"]
keys = ("reasoning_hazard_side_accuracy", "reasoning_hazard_kind_accuracy",
        "reasoning_manoeuvre_accuracy", "hazard_crossing_rate_in_path_scenes")
rows = [("camera", report["modes"])] + [
    (v, report["image_ablation"][v]) for v in report["image_ablation"] if v != "frames"]
print(f"{'frames':18s} {'mode':10s} " + " ".join(f"{k[:22]:>22s}" for k in keys))
for variant, modes in rows:
    for mode, summary in modes.items():
        print(f"{variant:18s} {mode:10s} " + " ".join(
            f"{summary.get(k) if summary.get(k) is None else round(summary[k], 3)!s:>22s}"
            for k in keys))
EOF
echo "seconds: data $((made - start)), train $((trained - made)), eval $((done_at - trained))"
