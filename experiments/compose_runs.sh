#!/bin/sh
# Route 2 of issue 12: every adapter on the compose world (seed $1, default 0), one run at a time
# on one thread; the table: python experiments/compose_table.py runs/compose-s${SEED}-*
SEED=${1:-0}
set -e
go() {  # go NAME FLAGS...: one train.py run into runs/compose-s$SEED-NAME (skipped if done)
  name=$1; shift
  out=runs/compose-s$SEED-$name
  [ -f $out/metrics.json ] || python train.py --task compose --seed $SEED --threads 1 --out $out "$@"
}
for opp in "" "--opposite"; do
  tag=${opp:+-opp}
  go full$tag --adapter full $opp
  go lora$tag --adapter lora $opp
  go embed$tag --adapter steer --positions codename --hook hook_resid_pre --layer 0 --lr 1e-1 $opp
  go steerL2$tag --adapter steer --positions codename --layer 2 --lr 1e-1 $opp
done
for L in 0 1 2 3; do go lora$L --adapter lora --layer $L; done
for L in 0 1 3; do go steerL$L --adapter steer --positions codename --layer $L --lr 1e-1; done
go steerall --adapter steer --positions all --layer 2 --lr 1e-1
# a fair chance for what underfits at the default budget: LoRA at lr 1e-2, late vectors 1000 steps
go lora-lr1e-2 --adapter lora --lr 1e-2
go lora-lr1e-2-opp --adapter lora --lr 1e-2 --opposite
for L in 0 1 2 3; do go lora$L-lr1e-2 --adapter lora --layer $L --lr 1e-2; done
for L in 1 2; do go steerL$L-1000 --adapter steer --positions codename --layer $L --lr 1e-1 --steps 1000; done
