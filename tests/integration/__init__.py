"""End-to-end tests against real PostgreSQL, Redis, gunicorn and celery worker processes."""
