"""The functional core of payengine: pure, deterministic, standard library only.

Time and ids come in as arguments; nothing here reads a clock, draws a random number, opens
a file or starts a thread. The actor shell (``actors``) feeds events to these functions,
persists what they return and carries out their effects.
"""
