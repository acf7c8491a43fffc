"""Serving: the served model (an upload becomes an answer), input checks, Grad-CAM explanations, the BentoML
service around them, and the HTTP client that external evaluation uses."""
