"""Training and export (torch). The only sub-package that imports torch; refine never does."""
