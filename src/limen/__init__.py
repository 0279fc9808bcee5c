"""Limen: Zero Trust private access with continuous access evaluation."""

__version__ = "0.1.0"
