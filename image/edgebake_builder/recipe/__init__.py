"""Recipes: YAML targets and layers, validated against one schema and resolved into one dict."""

from .load import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe"]
