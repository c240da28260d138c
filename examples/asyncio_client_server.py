"""asyncio: ``hintens.aio`` has the same Client, Server and ClientPool, driven by the event
loop: no thread per connection, and a reply wakes its waiting task directly.

Run it: ``python examples/asyncio_client_server.py``.
"""

import asyncio
import os
import tempfile

import hintens.aio

PATH = os.path.join(tempfile.mkdtemp(), "aio-demo.sock")


async def handler(payload):          # async def: each request runs as a task
    await asyncio.sleep(0)           # ... a database call, an HTTP request ...
    return bytes(payload).upper()


async def first_event(client):
    async for event in client.events():   # the server's Events, in order, as they arrive
        return bytes(event)


async def main():
    async with hintens.aio.Server(PATH, handler) as server:
        async with hintens.aio.Client(PATH) as client:
            print(bytes(await client.request(b"hello")))           # b'HELLO'
            replies = await asyncio.gather(*(client.request(b"%d" % i) for i in range(100)))
            print(len(replies), "concurrent requests, last:", bytes(replies[-1]))   # b'99'
            async with hintens.aio.ClientPool(PATH, 4, exactly_once=True) as pool:
                print(bytes(await pool.request(b"once")))          # retried safely
            listening = asyncio.create_task(first_event(client))   # listen first...
            server.broadcast(b"to every client")                     # ...then push
            print("event:", await listening)                         # b'to every client'


asyncio.run(main())
