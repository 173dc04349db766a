"""`mode eval` and the eval report: per-layer metrics (`metrics`), answer accuracy (`answers`), the
report's schema and files (`report`), its tables (`render`) and plot (`plots`), and the command
that evaluates a run, merged or plain model (`command`)."""
