#!/usr/bin/env bash
# Run N `quire serve` replicas behind nginx on this host, and replace them one at a time with no
# failed requests.
#
#   deploy/rolling_restart.sh start   STATE_DIR [--replicas N] [--listen [ADDR:]PORT] [-- SERVE_ARGS...]
#   deploy/rolling_restart.sh restart STATE_DIR [-- NEW_SERVE_ARGS...]
#   deploy/rolling_restart.sh stop    STATE_DIR
#   deploy/rolling_restart.sh status  STATE_DIR
#
# SERVE_ARGS are `quire serve` arguments (model and flags); the script adds --host 127.0.0.1 and
# --port 0 (each replica takes a free port and prints it), so do not pass those. `restart` with
# new arguments (or after editing STATE_DIR/serve.args) rolls out a new model or new flags.
#
# restart, for each replica in turn:
#   1. start a new `quire serve` and wait until its /health/ready is 200 (READY_TIMEOUT); if it
#      never is, kill it and stop the deploy: the old replica was never touched and keeps serving;
#   2. shift traffic: rewrite the nginx upstream list with the new port instead of the old one,
#      check it with `nginx -t`, `nginx -s reload`, and wait for workers running the new config
#      (old workers finish the requests they are proxying, then exit);
#   3. SIGTERM the old replica: it answers new requests with 503 (which nginx retries on another
#      replica), lets its requests in flight finish, and exits 0; wait for that (DRAIN_TIMEOUT).
#
# STATE_DIR holds everything about one deployment:
#   serve.args            the quire serve arguments, one per line
#   replicas/NAME         one file per replica (r1, r2, ...): name=, port=, pid=, log= lines
#   run/PID.rc            the exit status of replica process PID, once it has exited
#   logs/NAME-*.log       each replica process's output
#   nginx/                nginx's prefix: its config, nginx.pid, logs/access.log, logs/error.log
#
# Environment: QUIRE_BIN (quire executable, default `quire`), NGINX_BIN (default: nginx on PATH,
# else /usr/sbin/nginx), READY_TIMEOUT (s, default 300), DRAIN_TIMEOUT (s, default 120: must be at
# least quire's --shutdown-timeout, 30 s by default, plus DRAIN_MARGIN; checked against serve.args).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
QUIRE_BIN=${QUIRE_BIN:-quire}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
READY_TIMEOUT=${READY_TIMEOUT:-300}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
# After --shutdown-timeout quire takes up to 2 s (FAIL_FLUSH_S) to send the failed requests their
# error, 1 s (FINAL_GRACE_S) for connections and 10 s (SHUTDOWN_WAIT_S) for the engine to exit.
DRAIN_MARGIN=15
REPLICA_HOST=127.0.0.1

log() { printf '%s rolling_restart: %s\n' "$(date -u +%H:%M:%S.%3N)" "$*"; }
die() { log "error: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

# --- replica state files ---------------------------------------------------------------------

field() { sed -n "s/^$2=//p" "$1"; }  # field FILE KEY -> value

write_replica() {  # write_replica NAME PORT PID LOG: atomic, so readers never see half a file
    local tmp="$STATE/replicas/.$1.tmp"
    printf 'name=%s\nport=%s\npid=%s\nlog=%s\n' "$1" "$2" "$3" "$4" >"$tmp"
    mv "$tmp" "$STATE/replicas/$1"
}

replica_files() { find "$STATE/replicas" -maxdepth 1 -type f ! -name '.*' | sort; }

alive() { kill -0 "$1" 2>/dev/null; }

# kill_replica PID: SIGKILL a replica and everything it started (the engine-core child), which
# would otherwise linger holding its memory. spawn_replica runs each replica under `setsid`, so
# its process group is the wrapper bash's; kill the whole group except that wrapper, which must
# live on to record the exit status in run/PID.rc.
kill_replica() {
    local pid=$1 pgid members
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)  # gone already: nothing to kill
    if [[ -z $pgid ]]; then
        return 0
    fi
    members=$(pgrep -g "$pgid" | grep -vx "$pgid" || true)
    # shellcheck disable=SC2086  # one pid per word, on purpose
    kill -s KILL "$pid" $members 2>/dev/null || true
}

# check_drain_timeout: DRAIN_TIMEOUT must leave an old replica time to drain as it was told to
# (--shutdown-timeout in serve.args, else quire's default 30 s); a shorter one would SIGKILL
# replicas that are still finishing requests and cut their clients off.
check_drain_timeout() {
    local shutdown=30 prev="" arg
    while IFS= read -r arg; do
        case $arg in
            --shutdown-timeout=*) shutdown=${arg#*=} ;;
            *) [[ $prev == --shutdown-timeout ]] && shutdown=$arg ;;
        esac
        prev=$arg
    done <"$STATE/serve.args"
    [[ $shutdown =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--shutdown-timeout in $STATE/serve.args is not a number: '$shutdown'"
    if ! awk -v d="$DRAIN_TIMEOUT" -v s="$shutdown" -v m="$DRAIN_MARGIN" 'BEGIN { exit !(d + 0 >= s + m) }'; then
        die "DRAIN_TIMEOUT=${DRAIN_TIMEOUT}s is too short for --shutdown-timeout ${shutdown}: set DRAIN_TIMEOUT to at least $shutdown + ${DRAIN_MARGIN}s"
    fi
}

write_serve_args() {  # write_serve_args ARGS...: private (umask 077), since it may hold --api-key
    (umask 077 && printf '%s\n' "$@" >"$STATE/serve.args")
    check_drain_timeout
}

# --- one replica process -----------------------------------------------------------------------

# spawn_replica NAME: start `quire serve` in its own session; sets SPAWNED_PID and SPAWNED_LOG.
# A small bash parent waits for it and records its exit status in run/PID.rc, because the process
# outlives this script and only a parent can learn how it exited.
spawn_replica() {
    local name=$1 pidfile
    pidfile=$(mktemp "$STATE/run/spawn.XXXXXX")
    SPAWNED_LOG="$STATE/logs/$name-$(date -u +%Y%m%dT%H%M%S)-$RANDOM.log"
    local -a serve_args
    mapfile -t serve_args <"$STATE/serve.args"
    # shellcheck disable=SC2016  # $@, $LOG... expand in the inner shell, on purpose
    LOG=$SPAWNED_LOG PIDFILE=$pidfile RUN="$STATE/run" setsid bash -c '
        "$@" >"$LOG" 2>&1 &
        child=$!
        echo "$child" >"$PIDFILE"
        rc=0; wait "$child" || rc=$?
        echo "$rc" >"$RUN/.$child.rc" && mv "$RUN/.$child.rc" "$RUN/$child.rc"
    ' _ "$QUIRE_BIN" serve "${serve_args[@]}" --host "$REPLICA_HOST" --port 0 </dev/null >/dev/null 2>&1 &
    until [[ -s $pidfile ]]; do sleep 0.05; done
    SPAWNED_PID=$(<"$pidfile")
    rm -f "$pidfile"
}

# wait_ready PID LOG: print the replica's port once its /health/ready is 200; fail if it exits or
# READY_TIMEOUT passes first.
wait_ready() {
    local pid=$1 logfile=$2 port="" deadline=$((SECONDS + READY_TIMEOUT))
    while ((SECONDS < deadline)); do
        alive "$pid" || { log "replica pid $pid exited while starting; see $logfile" >&2; return 1; }
        if [[ -z $port ]]; then
            port=$(sed -n 's|.*listening on http://[0-9.]*:\([0-9]*\).*|\1|p' "$logfile" | head -n 1)
        fi
        if [[ -n $port ]] && curl -fsS -o /dev/null --max-time 5 "http://$REPLICA_HOST:$port/health/ready" 2>/dev/null; then
            echo "$port"
            return 0
        fi
        sleep 0.2
    done
    log "replica pid $pid not ready after ${READY_TIMEOUT}s; see $logfile" >&2
    return 1
}

# stop_replica PID [SIGNAL]: signal it (SIGTERM: drain), wait for it to exit (SIGKILL after
# DRAIN_TIMEOUT) and print its exit status from run/PID.rc ("unknown" if none was recorded).
stop_replica() {
    local pid=$1 sig=${2:-TERM} rcfile="$STATE/run/$1.rc" deadline=$((SECONDS + DRAIN_TIMEOUT)) killed=0
    if [[ $sig == KILL ]]; then
        kill_replica "$pid"
    else
        kill -s "$sig" "$pid" 2>/dev/null || true
    fi
    while alive "$pid"; do
        if ((SECONDS >= deadline && !killed)); then
            log "replica pid $pid still running after ${DRAIN_TIMEOUT}s; killing it" >&2
            kill_replica "$pid"
            killed=1
        fi
        sleep 0.1
    done
    local _
    for _ in {1..50}; do  # its parent writes the status right after the exit
        [[ -s $rcfile ]] && break
        sleep 0.1
    done
    cat "$rcfile" 2>/dev/null || echo unknown
}

# --- nginx -------------------------------------------------------------------------------------

# nginx reads $NGINX as a list of listening sockets inherited from an old binary (and then does
# not daemonize), so it must never reach nginx from the caller's environment.
ngx() { env -u NGINX "$NGINX_BIN" -p "$STATE/nginx/" -c "$STATE/nginx/nginx.conf" -e logs/error.log "$@"; }

nginx_pid() { cat "$STATE/nginx/nginx.pid" 2>/dev/null || true; }

worker_pids() { ps -o pid= --ppid "$1" | tr -d ' ' | sort; }

write_upstreams() {  # from the replica files; the caller checks and reloads
    local tmp="$STATE/nginx/.quire-upstreams.conf" file
    : >"$tmp"
    for file in $(replica_files); do
        # max_fails/fail_timeout: see the upstream block in quire.conf (503s count as failures).
        printf 'server %s:%s max_fails=3 fail_timeout=2s;  # %s pid %s\n' "$REPLICA_HOST" \
            "$(field "$file" port)" "$(field "$file" name)" "$(field "$file" pid)" >>"$tmp"
    done
    mv "$tmp" "$STATE/nginx/quire-upstreams.conf"
}

# reload_nginx: apply quire-upstreams.conf, and return once workers with the new config run
# (after this, no new request goes to a replica that left the list).
reload_nginx() {
    local master before now deadline=$((SECONDS + 30))
    master=$(nginx_pid)
    if [[ -z $master ]] || ! alive "$master"; then
        log "nginx is not running (no live pid in $STATE/nginx/nginx.pid)" >&2
        return 1
    fi
    ngx -t -q || return 1
    before=$(worker_pids "$master")
    ngx -s reload
    while ((SECONDS < deadline)); do
        now=$(worker_pids "$master")
        if [[ -n $(comm -13 <(echo "$before") <(echo "$now")) ]]; then
            return 0
        fi
        sleep 0.05
    done
    log "nginx did not start new workers within 30s; see $STATE/nginx/logs/error.log" >&2
    return 1
}

setup_nginx() {  # setup_nginx LISTEN
    local dir="$STATE/nginx"
    mkdir -p "$dir/logs" "$dir/temp"
    cp "$SCRIPT_DIR/nginx/nginx.conf" "$SCRIPT_DIR/nginx/quire.conf" "$dir/"
    printf 'listen %s;\n' "$1" >"$dir/quire-listen.conf"
    write_upstreams
    ngx -t -q || die "nginx rejected the configuration in $dir"
    # Detached from our output: the daemon would otherwise hold the caller's stdout/stderr open
    # (a caller reading them to the end would wait for nginx to exit).
    ngx </dev/null >/dev/null 2>>"$dir/logs/error.log" || die "nginx did not start; see $dir/logs/error.log"
}

# --- subcommands -------------------------------------------------------------------------------

cmd_start() {
    local replicas=2 listen=8080 name i port pid
    while (($#)); do
        case $1 in
            --replicas) replicas=$2; shift 2 ;;
            --listen) listen=$2; shift 2 ;;
            --) shift; break ;;
            *) die "start: unknown option '$1' (quire serve arguments go after --)" ;;
        esac
    done
    [[ $replicas =~ ^[1-9][0-9]*$ ]] || die "--replicas must be a positive integer, got '$replicas'"
    if [[ -d $STATE/replicas ]] && [[ -n $(replica_files) ]]; then
        die "$STATE already has replicas; run 'stop' first, or 'restart' to replace them"
    fi
    mkdir -p "$STATE/replicas" "$STATE/run" "$STATE/logs"
    write_serve_args "$@"
    local -a pids logs
    for ((i = 1; i <= replicas; i++)); do  # start all, then wait: they load in parallel
        spawn_replica "r$i"
        pids+=("$SPAWNED_PID") logs+=("$SPAWNED_LOG")
    done
    for ((i = 0; i < replicas; i++)); do
        name="r$((i + 1))"
        if ! port=$(wait_ready "${pids[i]}" "${logs[i]}"); then
            for pid in "${pids[@]}"; do kill_replica "$pid"; done
            rm -f "$STATE"/replicas/*
            die "replica $name did not become ready; all replicas stopped"
        fi
        write_replica "$name" "$port" "${pids[i]}" "${logs[i]}"
        log "replica $name ready: pid ${pids[i]}, port $port"
    done
    setup_nginx "$listen"
    log "nginx pid $(nginx_pid) listening on $listen, in front of $replicas replicas"
}

restart_one() {  # restart_one REPLICA_FILE
    local file=$1 name old_pid old_port new_port rc
    name=$(field "$file" name) old_pid=$(field "$file" pid) old_port=$(field "$file" port)
    log "replica $name: starting a replacement for pid $old_pid (port $old_port)"
    spawn_replica "$name"
    if ! new_port=$(wait_ready "$SPAWNED_PID" "$SPAWNED_LOG"); then
        stop_replica "$SPAWNED_PID" KILL >/dev/null
        die "replica $name: the new process never became ready; deploy stopped, pid $old_pid still serving"
    fi
    write_replica "$name" "$new_port" "$SPAWNED_PID" "$SPAWNED_LOG"
    write_upstreams
    if ! reload_nginx; then
        write_replica "$name" "$old_port" "$old_pid" "$(field "$file" log)"  # the old one serves on
        write_upstreams
        stop_replica "$SPAWNED_PID" KILL >/dev/null
        die "replica $name: nginx reload failed; deploy stopped, pid $old_pid still serving"
    fi
    if ! alive "$old_pid"; then  # crashed or killed earlier: nothing to drain
        log "replica $name: traffic shifted to pid $SPAWNED_PID (port $new_port); old pid $old_pid" \
            "had already exited with status $(stop_replica "$old_pid" KILL)"
        return 0
    fi
    log "replica $name: traffic shifted to pid $SPAWNED_PID (port $new_port); draining pid $old_pid"
    rc=$(stop_replica "$old_pid" TERM)
    log "replica $name: old pid $old_pid exited with status $rc"
    [[ $rc == 0 ]] || DRAIN_FAILURES=$((DRAIN_FAILURES + 1))
}

cmd_restart() {
    [[ -n $(replica_files 2>/dev/null) ]] || die "no replicas in $STATE; run 'start' first"
    if (($#)); then
        [[ $1 == -- ]] || die "restart: new quire serve arguments go after --"
        shift
        write_serve_args "$@"
    else
        check_drain_timeout  # serve.args may have been edited by hand
    fi
    DRAIN_FAILURES=0
    local file
    for file in $(replica_files); do restart_one "$file"; done
    ((DRAIN_FAILURES == 0)) || die "$DRAIN_FAILURES old replica(s) did not exit 0 (see their logs)"
    log "rolling restart done"
}

cmd_stop() {
    local master file pid
    master=$(nginx_pid)
    if [[ -n $master ]] && alive "$master"; then
        ngx -s quit  # graceful: stops listening, finishes the requests it is proxying
    fi
    for file in $(replica_files 2>/dev/null); do  # all drain at once
        kill -s TERM "$(field "$file" pid)" 2>/dev/null || true
    done
    for file in $(replica_files 2>/dev/null); do
        pid=$(field "$file" pid)
        # Signal 0: only wait. A second SIGTERM would make quire stop at once instead of draining.
        log "replica $(field "$file" name): pid $pid exited with status $(stop_replica "$pid" 0)"
        rm -f "$file"
    done
    while [[ -n $master ]] && alive "$master"; do sleep 0.1; done
    log "stopped"
}

cmd_status() {
    local file pid port state master
    for file in $(replica_files 2>/dev/null); do
        pid=$(field "$file" pid) port=$(field "$file" port)
        state=dead
        if alive "$pid"; then
            state=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$REPLICA_HOST:$port/health/ready" || true)
            state="running, /health/ready $state"
        fi
        echo "$(field "$file" name): pid $pid port $port ($state)"
    done
    master=$(nginx_pid)
    if [[ -n $master ]] && alive "$master"; then echo "nginx: pid $master"; else echo "nginx: not running"; fi
}

main() {
    (($# >= 1)) || usage 2
    local cmd=$1
    [[ $cmd == -h || $cmd == --help ]] && usage 0
    (($# >= 2)) || usage 2
    STATE=$(realpath -m "$2")
    shift 2
    command -v curl >/dev/null || die "curl is required"
    case $cmd in
        start) command -v "$NGINX_BIN" >/dev/null || die "nginx not found (set NGINX_BIN=/path/to/nginx)"
               cmd_start "$@" ;;
        restart) cmd_restart "$@" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *) usage 2 ;;
    esac
}

main "$@"
