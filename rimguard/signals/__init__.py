"""The signals: pure metrics (:mod:`.metrics`) and the online monitor that measures them (:mod:`.monitor`)."""
