"""Identity: Limen's built-in OpenID Connect provider.

- :mod:`limen.identity.passwords`: Argon2id hashing.
- :mod:`limen.identity.tokens`: ES256 access tokens (RFC 9068), JWKS, the edge's verifier.
- :mod:`limen.identity.service`: sign-in, sessions, refresh tokens, device grant, revocation.
- :mod:`limen.identity.api`: discovery, JWKS, token and device endpoints (FastAPI router).
"""
