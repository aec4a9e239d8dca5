# Sourced by .ci/test and .ci/run: make sure the services the tests need answer on
# 127.0.0.1, starting them if stopped and installing them with apt-get if missing.

apt_install() {
    if [ -z "${IDEM_APT_UPDATED:-}" ]; then
        apt-get update -qq
        IDEM_APT_UPDATED=1
    fi
    # A dpkg run that was interrupted (another install killed midway) blocks every later
    # install until it is configured; a half-installed package needs --fix-broken.
    DEBIAN_FRONTEND=noninteractive dpkg --configure -a >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get --fix-broken install -y -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    }
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

ensure_mariadb() {
    command -v mariadb >/dev/null 2>&1 || apt_install mariadb-server mariadb-client
    if mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; then
        mariadb -h 127.0.0.1 -P 3306 -u root -e 'CREATE DATABASE IF NOT EXISTS test'
        return 0
    fi
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    if [ ! -d /var/lib/mysql/mysql ]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    (service mariadb start || /etc/init.d/mariadb start || (mysqld_safe --bind-address=127.0.0.1 --port=3306 >/dev/null 2>&1 &)) >/dev/null 2>&1 || true
    wait_for mariadb sh -c 'mariadb -h 127.0.0.1 -P 3306 -u root -e "SELECT 1" || mariadb -u root -e "SELECT 1"'
    # Tests connect as root over TCP with an empty password, as on the project's machines.
    mariadb -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); FLUSH PRIVILEGES" >/dev/null 2>&1 || true
    mariadb -h 127.0.0.1 -P 3306 -u root -e 'CREATE DATABASE IF NOT EXISTS test'
}

port_open() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1
}

ensure_nats() {
    command -v nats-server >/dev/null 2>&1 || apt_install nats-server
    port_open 4222 && return 0
    mkdir -p /var/lib/nats-server
    nohup nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log >/dev/null 2>&1 &
    wait_for nats port_open 4222
}

ensure_rabbitmq() {
    command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
    port_open 5672 && return 0
    (service rabbitmq-server start || /etc/init.d/rabbitmq-server start) >/dev/null 2>&1 || true
    port_open 5672 || (nohup rabbitmq-server >/var/log/rabbitmq-ci.log 2>&1 &)
    wait_for rabbitmq port_open 5672
}

ensure_etcd() {
    # The cluster tests start their own etcd members on loopback ports (see scripts/cluster.sh);
    # they only need the binaries: etcd, and etcdctl for their health checks (a machine can
    # have the server package without the client one).
    if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
        apt_install etcd-server etcd-client
    fi
}

ensure_protoc() {
    # etcd-client generates its gRPC code with protoc at build time.
    command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler
}
