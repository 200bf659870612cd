"""Files ``ftkit new-task`` copies: ``task/*.tmpl``, with ``{{name}}``-style placeholders filled in."""
