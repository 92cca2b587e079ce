"""The actor shell: pykka actors for orders and voucher accounts, the runtime seam, the
``Engine`` API, outbox delivery and reconciliation.

Users import the public names from the top of the package (``from payengine import
Engine``); the modules here are the implementation.
"""
