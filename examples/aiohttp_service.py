"""Inside a web service: one ``hintens.aio.Client`` serves every request handler of an
aiohttp application, opened and closed with the app. The example starts a hintens backend,
the web app on a free port, asks it one HTTP request, and stops.

Run it: ``python examples/aiohttp_service.py``.
"""
# needs: aiohttp

import asyncio
import os
import tempfile

from aiohttp import ClientSession, web

import hintens.aio


async def lookup(request):
    reply = await request.app["hintens"].request(request.match_info["key"].encode(),
                                                 timeout=0.5)
    return web.Response(body=bytes(reply))


def make_app(backend):                          # backend: the hintens server's address
    async def hintens_client(app):
        async with hintens.aio.Client(backend) as client:
            app["hintens"] = client
            yield                               # the client closes with the app

    app = web.Application()
    app.router.add_get("/lookup/{key}", lookup)
    app.cleanup_ctx.append(hintens_client)
    return app


async def main():
    backend = os.path.join(tempfile.mkdtemp(), "backend.sock")
    async with hintens.aio.Server(backend, lambda key: b"value of " + bytes(key)):
        runner = web.AppRunner(make_app(backend))   # web.run_app(...) in a real service
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/lookup/user-42") as response:
                print(response.status, await response.text())   # 200 value of user-42
        await runner.cleanup()


asyncio.run(main())
