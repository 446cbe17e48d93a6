# One device call: where the CLI's imports spend a fresh machine's time (bench/probe_import_io.py, modes in turn,
# the page cache dropped before each but the first). Usage: bash bench/probe_import_io_cmd.sh $OUT
OUT=${1:?out dir}
SP=$(python3 -c "import sysconfig;print(sysconfig.get_paths()['purelib'])"); echo "$SP"; df -T "$SP" | tail -1
du -sh "$SP"/torch "$SP"/transformers "$SP"/nvidia "$SP"/triton 2>/dev/null; nproc
NV="torch,transformers,triton,safetensors,tokenizers,numpy,sympy,jinja2,huggingface_hub,networkx,regex,yaml,tqdm"
NV="$NV,filelock,fsspec,packaging,typing_extensions,mpmath,nvidia"
i=0
for mode in first plain pre pre_nv plain pre pre_nv; do
  i=$((i + 1)); drop="--drop-caches"; [ $mode = first ] && drop=""
  case $mode in first|plain) extra="";; pre) extra="--preread";; pre_nv) extra="--preread --packages $NV --workers 32";; esac
  echo "== $i $mode"
  timeout 150 python3 bench/probe_import_io.py --out "$OUT/io_${i}_$mode.json" $drop $extra 2>&1 | tail -2
done
