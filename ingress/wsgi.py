"""gunicorn entry point: `gunicorn ingress.wsgi:app`. Settings are read and validated at import (start)."""

from ingress.app import create_app
from shared.config import get_settings
from shared.logs import configure_logging

settings = get_settings()
configure_logging(settings)
app = create_app(settings)
