# Sourced by the provenance zoo scripts: `serve NAME DIR PORT` starts `distill serve` for a model
# dir in the background (its pid kept in $Z/servers.pid, its log in $Z/serve-NAME.log) and waits
# up to 180 s for /health; `stop_servers` stops every server started so, and runs on exit.
# Needs $BIN (the distill binary) and $Z (the zoo dir).
serve() { # NAME DIR PORT
  "$BIN" serve --model "$2" --addr "127.0.0.1:$3" --model-name "$1" >"$Z/serve-$1.log" 2>&1 &
  echo $! >>"$Z/servers.pid"
  for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$3/health" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "$(basename "$0"): the server for $1 did not come up (see $Z/serve-$1.log)" >&2; exit 1
}
stop_servers() { [ -e "$Z/servers.pid" ] && xargs -r kill <"$Z/servers.pid" 2>/dev/null; rm -f "$Z/servers.pid"; }
trap stop_servers EXIT
stop_servers
