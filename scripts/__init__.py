"""Developer scripts (demo assets for `make serve`). Not part of the installed `loraplex` package."""
