"""Settings from the environment, with safe defaults for the embedded mode.

Two modes share every code path: embedded (the demo: DATABASE_URL unset, a SQLite file under
var/; REDIS_URL unset, an in-memory channel layer and Celery tasks run in-process) and
production (PostgreSQL, Redis, a Celery worker and beat). README's "Modes" lists every
variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_bool(name: str, default: bool = False) -> bool:
    """A yes/no variable; a value it does not know is an error, not False (DEBUG=treu)."""
    value = env(name, "1" if default else "0").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{name}={os.environ[name]!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}"
    )


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG")
PRODUCTION = bool(env("DATABASE_URL"))
SECRET_KEY = env("SECRET_KEY", "embedded-mode-only-not-secret")
if not DEBUG and SECRET_KEY == "embedded-mode-only-not-secret" and PRODUCTION:
    raise RuntimeError("Set SECRET_KEY in production (DATABASE_URL is set).")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",  # first: its runserver serves websockets too
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "channels",
    "elections",
    "dashboard.web",
    "demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "dashboard.urls"
ASGI_APPLICATION = "dashboard.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATA_DIR = Path(env("ELECTORATE_DATA_DIR", str(BASE_DIR / "var")))
DATABASES = {
    "default": dj_database_url.parse(
        env("DATABASE_URL", f"sqlite:///{DATA_DIR / 'electorate.sqlite3'}"), conn_max_age=0
    )
}
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # A pooled connection is checked before use: after a PostgreSQL restart the pool hands
    # out a fresh one instead of a dead one.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Under ASGI every request runs on a thread of its own, so persistent connections
    # (CONN_MAX_AGE) would leave one open connection per finished request until the server
    # refuses clients. psycopg's pool lends connections per use instead.
    DATABASES["default"]["OPTIONS"] = {
        "pool": {
            "min_size": 2,
            "max_size": int(env("ELECTORATE_DB_POOL", "16")),
            "timeout": 10,
        }
    }
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        # Writers queue instead of failing; IMMEDIATE avoids lock-upgrade deadlocks.
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL")
#: channels-redis waits for messages in a blocking BZPOPMIN of 5 s (``brpop_timeout``).
#: redis-py's default read timeout is also 5 s, so the two raced and about one idle websocket
#: in twenty was dropped with 1011 ("Timeout reading from ..."). The read timeout must outlast
#: the blocking wait; keepalives still notice a dead Redis.
REDIS_SOCKET_TIMEOUT = 15.0
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_timeout": REDIS_SOCKET_TIMEOUT,
                        "socket_connect_timeout": 3.0,
                        "socket_keepalive": True,
                        # redis-py caps a pool at 100 connections and then fails the call:
                        # 1,000 agents reconnecting at once each join their group.
                        "max_connections": 2000,
                    }
                ],
                "prefix": env("ELECTORATE_CHANNEL_PREFIX", "electorate"),
                "capacity": 1000,
                "expiry": 30,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: a real broker in production; in embedded mode tasks run in-process, and the
# periodic ones on a ticker thread inside the server process (elections.ticker).
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_IGNORE_RESULT = True
#: One queue per deployment: two dashboards sharing a Redis must not run each other's tasks.
CELERY_TASK_DEFAULT_QUEUE = env("ELECTORATE_CELERY_QUEUE", "electorate")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
#: Campaign history (transitions) older than this many days is deleted; terms, commands and
#: the audit log are kept.
ELECTORATE_RETENTION_DAYS = float(env("ELECTORATE_RETENTION_DAYS", "90"))
#: Where the audit log's head is appended every minute (empty: the log line only). Keep it
#: where the database's owner cannot rewrite it; `verify_audit --heads-file` checks it.
ELECTORATE_AUDIT_HEAD_FILE = env("ELECTORATE_AUDIT_HEAD_FILE", str(DATA_DIR / "audit-heads.ndjson"))
ELECTORATE_TICKER = env_bool("ELECTORATE_TICKER", default=not REDIS_URL)

#: An agent that has not sent anything for this long is marked offline by the sweep.
ELECTORATE_AGENT_STALE_AFTER = float(env("ELECTORATE_AGENT_STALE_AFTER", "15"))
#: An election no agent has reported for this many seconds is an orphan (the agents page).
ELECTORATE_ORPHAN_AFTER = float(env("ELECTORATE_ORPHAN_AFTER", str(24 * 3600)))
#: An agent whose clock is off the dashboard's by more than this (seconds) is flagged.
ELECTORATE_CLOCK_SKEW_WARN = float(env("ELECTORATE_CLOCK_SKEW_WARN", "1"))
#: Frames an agent may send a second on average, and in a burst, before it is disconnected.
ELECTORATE_AGENT_FRAME_RATE = float(env("ELECTORATE_AGENT_FRAME_RATE", "50"))
ELECTORATE_AGENT_FRAME_BURST = float(env("ELECTORATE_AGENT_FRAME_BURST", "500"))
#: Coalescing window of the live map: a burst of changes becomes one update.
ELECTORATE_LIVE_COALESCE = float(env("ELECTORATE_LIVE_COALESCE", "0.1"))
#: The live map never sends a websocket frame larger than this (the server refuses 1 MiB).
ELECTORATE_LIVE_FRAME_LIMIT = int(env("ELECTORATE_LIVE_FRAME_LIMIT", str(256 * 1024)))
#: An election page that got no update for this long is drawn again (its timeline's "now").
ELECTORATE_LIVE_PAGE_REDRAW = float(env("ELECTORATE_LIVE_PAGE_REDRAW", "30"))
#: Threads (each with its own database connection) for the websockets' database work.
ELECTORATE_DB_THREADS = int(env("ELECTORATE_DB_THREADS", "8"))
#: Failover gaps: the window of an election's statistics (seconds), and the recovery-time
#: objective a gap is held against when the election has no ``rto`` label (unset: none).
ELECTORATE_GAP_WINDOW = float(env("ELECTORATE_GAP_WINDOW", "86400"))
ELECTORATE_RTO = float(env("ELECTORATE_RTO")) if env("ELECTORATE_RTO") else None
#: Flapping: more than this many new terms within this many seconds (PD's damper: 3 in 5 min).
ELECTORATE_FLAP_CHANGES = int(env("ELECTORATE_FLAP_CHANGES", "3"))
ELECTORATE_FLAP_WINDOW = float(env("ELECTORATE_FLAP_WINDOW", "300"))

# Webhooks (configured in the admin; elections.webhooks): how long a request may take, how
# long a burst is gathered before one request carries it, events per request, and the
# backoff after a failure (doubling from BACKOFF up to BACKOFF_CAP seconds; a task retries
# RETRIES times, then the periodic sweep starts over).
ELECTORATE_WEBHOOK_TIMEOUT = float(env("ELECTORATE_WEBHOOK_TIMEOUT", "5"))
ELECTORATE_WEBHOOK_COALESCE = float(env("ELECTORATE_WEBHOOK_COALESCE", "1"))
ELECTORATE_WEBHOOK_BATCH = int(env("ELECTORATE_WEBHOOK_BATCH", "500"))
ELECTORATE_WEBHOOK_BACKOFF = float(env("ELECTORATE_WEBHOOK_BACKOFF", "2"))
ELECTORATE_WEBHOOK_BACKOFF_CAP = float(env("ELECTORATE_WEBHOOK_BACKOFF_CAP", "300"))
ELECTORATE_WEBHOOK_RETRIES = int(env("ELECTORATE_WEBHOOK_RETRIES", "10"))

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "map"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Only for collectstatic (production images); whitenoise serves from the finders otherwise.
STATIC_ROOT = Path(env("STATIC_ROOT")) if env("STATIC_ROOT") else None
WHITENOISE_USE_FINDERS = True  # serve straight from the source dirs: no collectstatic needed

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads it for hx-post
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"

# HTTPS: on by default in production (manage.py check --deploy passes), off in the demo.
# ELECTORATE_HTTPS=0 serves a production database over plain HTTP (a lab, a test);
# behind a TLS-terminating proxy, name the header it sets (e.g. HTTP_X_FORWARDED_PROTO).
ELECTORATE_HTTPS = env_bool("ELECTORATE_HTTPS", default=PRODUCTION and not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = ELECTORATE_HTTPS
SECURE_SSL_REDIRECT = ELECTORATE_HTTPS
SECURE_HSTS_SECONDS = int(env("ELECTORATE_HSTS_SECONDS", "31536000")) if ELECTORATE_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("ELECTORATE_HSTS_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env_bool("ELECTORATE_HSTS_PRELOAD")
# Preloading is a commitment a deployment opts into (ELECTORATE_HSTS_PRELOAD=1), not a default.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD or not ELECTORATE_HTTPS else ["security.W021"]
if env("ELECTORATE_PROXY_SSL_HEADER"):
    SECURE_PROXY_SSL_HEADER = (env("ELECTORATE_PROXY_SSL_HEADER"), "https")

# Every script and style is a file of ours: no inline code, no eval (htmx's hx-on is off),
# nothing from elsewhere. The live map's websocket is same-origin ('self' covers ws:/wss:).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "frame-ancestors": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "object-src": [NONE],
    }
}

# Failed sign-ins are throttled per user and per address (dashboard.throttle); the counts
# live in the cache, shared by every process in production.
CACHES = (
    {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    if REDIS_URL
    else {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}, "django.channels.server": {"level": "WARNING"}},
}
