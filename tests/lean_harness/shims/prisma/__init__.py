"""Inert stand-in for the `prisma` package, which kimina-ast-server imports at start (SPEC 11).

The real one needs `prisma generate` (a download); the server only uses it when a database URL is set, and the
test harness never sets one.
"""


class Prisma:
    def is_connected(self) -> bool:
        return False

    async def connect(self) -> None:
        raise RuntimeError("inert prisma stand-in: no database in the test harness")

    async def disconnect(self) -> None:
        return None
