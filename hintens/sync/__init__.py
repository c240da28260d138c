"""The sync front end: ``Client``, ``CodedClient``, ``ClientPool`` and ``Server``, driven by
the calling threads (leader/follower reading on the client, a thread per connection on the
server), over one ``Connection`` driver that both share. The names are exported by
``hintens``; import them from there.
"""
