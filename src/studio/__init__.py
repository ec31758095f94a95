"""The subsystems beside src/app.py, one module each (CLAUDE.md has the map). None of them imports `app`."""
