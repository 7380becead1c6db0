"""gunicorn entry point of the session browser on its own address: `chatsessions admin` (ADMIN_BIND)."""

from ingress.browser import create_app
from shared.config import get_settings
from shared.logs import configure_logging

settings = get_settings()
configure_logging(settings)
app = create_app(settings)
