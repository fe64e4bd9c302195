#!/usr/bin/env bash
# bash mlflow/start_server.sh [--dry-run] [extra `mlflow server` options, e.g. --app-name basic-auth]
#
# An MLflow tracking server for moekd: a database backend store, artifacts uploaded and served through the server
# (clients need no bucket credentials), listening on 127.0.0.1 only. Reach it from elsewhere through an SSH tunnel
# or `kubectl port-forward` (mlflow/README.md), not by opening the port.
#
# Settings (environment; the names are the ones `mlflow server` itself reads):
#   MOEKD_MLFLOW_DIR              folder for the default stores; default ~/.local/share/moekd-mlflow
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///$MOEKD_MLFLOW_DIR/mlflow.db
#                                 PostgreSQL: postgresql://user:pass@host:5432/mlflow (pip install -e ".[team]":
#                                 SQLAlchemy 2.1 reads postgresql:// as psycopg 3, not psycopg2)
#   MLFLOW_ARTIFACTS_DESTINATION  default $MOEKD_MLFLOW_DIR/artifacts
#                                 S3: s3://bucket/mlflow-artifacts (pip install boto3; AWS credentials for the server)
#   MLFLOW_HOST                   default 127.0.0.1; anything else prints a warning (the server has no login)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                default 1 (answers /health in ~10 s; mlflow's default of 4 took 24 s, STACK.md)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted; mlflow's default is localhost and private IPs
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false here: those server-side jobs are GenAI scorers/evaluation,
#                                 which moekd never uses, and they cost 8 more processes (mlflow's default: true)
# With --app-name basic-auth (a login for every request but /health; pip install -e ".[team]" for Flask-WTF):
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required by mlflow (CSRF); the same on every server of one store
#   MLFLOW_AUTH_CONFIG_PATH       an ini file: [mlflow] database_uri = postgresql://.../mlflow_auth, default_permission;
#                                 mlflow's default keeps users in ./basic_auth.db of the folder it was started from
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin's password, read once, when the user store is empty (mlflow has no default)
# Stop the server by its process group (Ctrl-C in its terminal, or kill -- -PGID): mlflow's helper processes
# outlive a signal sent to the mlflow process alone.
# --dry-run prints the settings and the command instead of starting the server.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi

store_dir="${MOEKD_MLFLOW_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/moekd-mlflow}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${store_dir}/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${store_dir}/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-1}"

if ! [[ "$port" =~ ^[0-9]+$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
    echo "start_server.sh: MLFLOW_PORT=$port is not a port number; set e.g. MLFLOW_PORT=5000" >&2
    exit 2
fi
case "$host" in
    127.0.0.1 | localhost | ::1) ;;
    *)
        echo "start_server.sh: WARNING: MLFLOW_HOST=$host is not loopback. This MLflow server has no login: anyone" \
             "who can reach $host:$port can read and change runs and register models (and a registered pyfunc" \
             "model runs its code when loaded). Prefer MLFLOW_HOST=127.0.0.1 and an SSH tunnel or kubectl" \
             "port-forward; if you must expose it, firewall the port, set MLFLOW_SERVER_ALLOWED_HOSTS and pass" \
             "--app-name basic-auth." >&2
        ;;
esac

# Local stores need their folders; remote ones (postgresql://, s3://) are the user's to create.
if [[ "$backend" == sqlite:///* ]]; then
    db_path="${backend#sqlite:///}"
    [[ "$db_path" == /* ]] || db_path="$PWD/$db_path"
    [[ $dry_run == 1 ]] || mkdir -p "$(dirname "$db_path")"
fi
if [[ "$artifacts" != *://* ]]; then
    [[ $dry_run == 1 ]] || mkdir -p "$artifacts"
fi

# The backend URI goes through the environment (mlflow reads MLFLOW_BACKEND_STORE_URI), not argv, so a database
# password does not show up in `ps`.
export MLFLOW_BACKEND_STORE_URI="$backend"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
cmd=(mlflow server
     --serve-artifacts --artifacts-destination "$artifacts"
     --host "$host" --port "$port" --workers "$workers"
     "$@")

if [[ $dry_run == 1 ]]; then
    shown="$backend"
    [[ "$backend" != *@* ]] || shown="${backend%%://*}://(credentials hidden)"
    echo "MLFLOW_BACKEND_STORE_URI=$shown"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
if ! command -v mlflow >/dev/null 2>&1; then
    echo "start_server.sh: mlflow not found on PATH; activate the project's environment (. .venv/bin/activate)" >&2
    exit 2
fi
# What mlflow would otherwise report as a traceback, after its ~10 s start, in the middle of its log.
mlflow_python="$(dirname "$(command -v mlflow)")/python"  # the interpreter of the mlflow found on PATH
[[ -x "$mlflow_python" ]] || mlflow_python=python3
python_has() { "$mlflow_python" -c "import $1" >/dev/null 2>&1; }
if [[ "$backend" == postgresql://* || "$backend" == postgres://* ]] && ! python_has psycopg; then
    echo "start_server.sh: ${backend%%://*}://... needs the psycopg driver: pip install -e \".[team]\"" \
         "(or pip install 'psycopg[binary]')" >&2
    exit 2
fi
if [[ " $* " == *" basic-auth "* || " $* " == *"=basic-auth "* ]]; then
    if ! python_has flask_wtf; then
        echo "start_server.sh: --app-name basic-auth needs Flask-WTF: pip install -e \".[team]\"" \
             "(or 'mlflow[auth]')" >&2
        exit 2
    fi
    if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
        echo "start_server.sh: --app-name basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (any long random string," \
             "the same on every server of this store):" \
             "export MLFLOW_FLASK_SERVER_SECRET_KEY=\$(openssl rand -hex 32)" >&2
        exit 2
    fi
fi
echo "start_server.sh: MLflow on http://$host:$port (artifacts: $artifacts)" >&2
exec "${cmd[@]}"
