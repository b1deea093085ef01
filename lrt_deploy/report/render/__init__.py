"""Renderers of the report model: Markdown, a self-contained HTML page, inline SVG charts."""
