"""The actions on the model: the safety anchor and parameter anchoring (:mod:`.anchor`), the activation
penalty and the tie of every regularizer into the trainer's backward (:mod:`.penalty`), and freezing
(:mod:`.freeze`). The engine decides when each runs (:mod:`rimguard.engine`)."""
