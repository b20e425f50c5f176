#!/usr/bin/env bash
# The same sweep on a terminal (tmux, 100 columns) and piped to a file: what a user sees in each.
set -u
OUT=${1:-/tmp/tmuxcheck}
rm -rf "$OUT/tty" "$OUT/pipe" "$OUT"/pane-*.txt
CMD="lora-lab sweep --ranks 1,2 --epochs 1 --batch-size 16 --max-length 64"
tmux kill-session -t check 2>/dev/null
tmux new-session -d -s check -x 100 -y 30
tmux send-keys -t check "cd $OUT && $CMD --out tty; echo DONE-TTY" Enter
for i in $(seq 1 80); do
  sleep 5
  tmux capture-pane -p -t check > "$OUT/pane-$(printf %03d $i).txt"
  grep -q "^DONE-TTY" "$OUT/pane-$(printf %03d $i).txt" && break
done
tmux capture-pane -p -S -200 -t check > "$OUT/pane-final.txt"
tmux kill-session -t check
start=$(date +%s)
(cd "$OUT" && $CMD --out pipe 2>&1 | cat > "$OUT/piped.log")
echo "piped run: $(( $(date +%s) - start )) s" >> "$OUT/piped.log"
