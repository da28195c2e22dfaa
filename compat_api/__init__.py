"""The legacy REST API: a Flask app over a one-second history of the exporter's tally."""
