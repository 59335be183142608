FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml ./
COPY agent agent
COPY elections elections
COPY dashboard dashboard
RUN pip install --no-cache-dir ".[deploy]"
COPY manage.py ./
COPY templates templates
COPY static static
COPY deploy deploy
ENV PYTHONUNBUFFERED=1 ELECTORATE_WEB_PROCESSES=2 ELECTORATE_BIND=tcp://0.0.0.0:8000
EXPOSE 8000
# Several daphne processes on one socket (see deploy/supervisord.conf).
CMD ["supervisord", "-c", "deploy/supervisord.conf", "--pidfile", "/tmp/supervisord.pid"]
