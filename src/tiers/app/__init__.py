"""The application tier: prefork app servers running a WSGI app.

``python -m tiers.app`` runs one server, a gunicorn master in that very
process (``server``); ``loader`` imports the app named on the command line;
``health`` answers the proxy's health check in front of the app and
``metrics`` this worker's cache metrics to scrapers on the host.
"""
