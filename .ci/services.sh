# Sourced by .ci/test and .ci/run: make sure the services the tests need answer on
# 127.0.0.1, starting them if stopped and installing them with apt-get if missing.

apt_install() {
    if [ -z "${IDEM_APT_UPDATED:-}" ]; then
        apt-get update -qq
        IDEM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # name, command...
    local name=$1
    shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    echo "ci: $name did not come up" >&2
    return 1
}

ensure_postgres() {
    command -v pg_isready >/dev/null 2>&1 || apt_install postgresql
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        return 0
    fi
    local version fresh=""
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
        apt_install postgresql
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        fresh=1
    fi
    if [ -n "$fresh" ] || ! grep -q '^host.*127.0.0.1/32.*trust' "/etc/postgresql/$version/main/pg_hba.conf"; then
        # Tests connect as postgres over TCP without a password, as on the project's machines.
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "/etc/postgresql/$version/main/pg_hba.conf"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_for postgresql pg_isready -q -h 127.0.0.1 -p 5432
    if ! psql -h 127.0.0.1 -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
        psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null
    fi
}

ensure_redis() {
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server redis-tools
    if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
        return 0
    fi
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for redis sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
}

ensure_build_deps() {
    # bindgen (foundationdb-sys) needs libclang; the bundled SQLite needs a C compiler.
    dpkg -s libclang-dev >/dev/null 2>&1 || apt_install libclang-dev
    command -v cc >/dev/null 2>&1 || apt_install build-essential
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
}
