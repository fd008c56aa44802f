#!/usr/bin/env bash
# Check deploy/redis.conf with this machine's redis-server: it starts (on a free port, in a temporary directory),
# it has the settings it promises, it refuses clients without the password, and a list pushed before a SIGKILL is
# still there after a restart (the fsync'd append-only file). Exit 0 when all hold.
set -u
cd "$(dirname "$0")/.."
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export REDISCLI_AUTH=check-password-123
failed=0
start() {
    redis-server deploy/redis.conf --port "$port" --dir "$dir" --requirepass "$REDISCLI_AUTH" >> "$dir/log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do redis-cli -p "$port" PING 2>/dev/null | grep -q PONG && return; sleep 0.1; done
    echo "FAIL: redis-server did not start:"; tail -5 "$dir/log"; exit 1
}
expect() {  # expect NAME GOT WANTED
    if [ "$2" = "$3" ]; then echo "ok   $1 = $2"; else echo "FAIL $1 = $2 (wanted $3)"; failed=1; fi
}
start
for pair in appendonly=yes appendfsync=always maxmemory-policy=noeviction protected-mode=yes daemonize=no; do
    expect "${pair%%=*}" "$(redis-cli -p "$port" CONFIG GET "${pair%%=*}" | sed -n 2p)" "${pair#*=}"
done
expect "dir (overridden)" "$(redis-cli -p "$port" CONFIG GET dir | sed -n 2p)" "$dir"
expect "without password" "$(env -u REDISCLI_AUTH redis-cli -p "$port" LLEN ovsd3.check 2>&1 | grep -o NOAUTH)" NOAUTH
redis-cli -p "$port" RPUSH ovsd3.check job-1 job-2 > /dev/null
kill -9 "$pid"; wait "$pid" 2> /dev/null   # no shutdown save: only what the append-only file holds survives
start
expect "list length after SIGKILL and restart" "$(redis-cli -p "$port" LLEN ovsd3.check)" 2
redis-cli -p "$port" SHUTDOWN NOSAVE > /dev/null 2>&1; wait "$pid" 2> /dev/null
exit $failed
