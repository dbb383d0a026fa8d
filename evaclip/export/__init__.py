"""Exporters: open_clip folder format (+ timm image tower)."""
