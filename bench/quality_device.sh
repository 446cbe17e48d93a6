#!/usr/bin/env bash
# Steps of the quality grid on a lent GPU machine (BENCHMARKS.md, "Quality across seeds"), one short command
# per device call. Models travel in chunks in .stage/chunks, one per call (`split -n 19 FILE .stage/chunks/NAME.`
# for the 1.5B GGUF: each chunk plus the tracked tree must stay under 64 MiB), and are assembled on the
# machine; the queues run detached (setsid) while the next chunks travel, so the GPUs work during the carrying.
#   bash bench/quality_device.sh setup                 # wheels, a stable copy of the repo and its data
#   bash bench/quality_device.sh take                  # move this call's chunks (and a gem tokenizer) to /root/stage
#   bash bench/quality_device.sh assemble NAME SHA256  # cat the chunks, check the sum
#   bash bench/quality_device.sh start NAME [PER_GPU [GPUS]]  # queue bench/quality_jobs/NAME.txt, detached
#                                                      # (GPUS: e.g. 1 or 0,1; default all)
#   bash bench/quality_device.sh status [SECONDS]      # wait up to SECONDS for the queues, then tar results to $OUT
#   bash bench/quality_device.sh stop NAME [JOB ...]   # end a queue (or some of its jobs); finished cells stay
set -u
S=/root/stage
R=$S/repo
mkdir -p $S
case "$1" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S/site .whl/*.whl || exit 1
  rm -rf $R && mkdir -p $R && tar --exclude=./.stage/chunks --exclude=./.stage/DLP -cf - . | tar -xf - -C $R
  nvidia-smi -L; free -g | head -2; df -h $S | tail -1
  ;;
take)
  for f in .stage/chunks/*; do [ -f "$f" ] && mv "$f" $S/; done   # moved: kept copies would travel again
  if [ -f .stage/gemtok/tokenizer.json.gz ]; then
    mkdir -p $S/gem.tokenizer && gunzip -c .stage/gemtok/tokenizer.json.gz > $S/gem.tokenizer/tokenizer.json
    cp .stage/gemtok/tokenizer_config.json $S/gem.tokenizer/
  fi
  ls $S | tr '\n' ' '; echo
  ;;
assemble)
  cat $S/$2.?? > $S/$2.gguf && sum=$(sha256sum $S/$2.gguf | cut -d' ' -f1)
  [ "$sum" = "$3" ] || { echo "sha256 of $2.gguf is $sum, expected $3"; exit 1; }
  rm -f $S/$2.??; echo "$2.gguf ok ($(stat -c %s $S/$2.gguf) bytes)"
  ;;
start)
  cd $R && export PYTHONPATH=$S/site:$R LAYERPRUNE_DATA=$R/.devdata LAYERPRUNE_CACHE=$S/cache \
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  python3 bench/quality_queue.py start bench/quality_jobs/$2.txt $S/work/$2 --per-gpu "${3:-1}" --gpus "${4:-}"
  ;;
status)
  cd $R && end=$(( $(date +%s) + ${2:-0} ))
  while :; do
    all=1; for d in $S/work/*/; do [ -f "$d/queue.done" ] || all=0; done
    [ $all = 1 ] || [ "$(date +%s)" -ge $end ] && break
    sleep 5
  done
  for d in $S/work/*/; do echo "== $d"; python3 bench/quality_queue.py status "$d"; done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  [ -n "${OUT:-}" ] && tar -czf "$OUT/work.tgz" --exclude="*.safetensors" -C $S work && ls -la "$OUT"
  ;;
stop)
  cd $R && python3 bench/quality_queue.py stop $S/work/$2 "${@:3}"
  ;;
*) echo "usage: see the top of $0" >&2; exit 2 ;;
esac
