FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml ./
COPY agent agent
COPY elections elections
COPY dashboard dashboard
RUN pip install --no-cache-dir .
COPY manage.py ./
COPY templates templates
COPY static static
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "dashboard.asgi:application"]
