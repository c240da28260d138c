"""TCP with TLS and client certificates: only clients whose certificate chains to your CA,
and whose subject is listed, get in.

The certificates here are made fresh at run time by ``trustme`` (a throwaway CA, for tests
and examples); in production they come from your own CA.

Run it: ``python examples/tcp_tls.py``.
"""
# needs: trustme

import os
import ssl
import tempfile

import trustme

import hintens

# A throwaway CA, a server certificate for 127.0.0.1 and a client certificate with the
# subject "O=Example,OU=Payments,CN=billing", written as PEM files into a fresh directory.
os.chdir(tempfile.mkdtemp())
ca = trustme.CA()
ca.cert_pem.write_to_path("ca.pem")
server_cert = ca.issue_cert("127.0.0.1", "localhost")
server_cert.cert_chain_pems[0].write_to_path("server.pem")
server_cert.private_key_pem.write_to_path("server.key")
billing = ca.issue_cert("billing.example", common_name="billing", organization_name="Example",
                        organization_unit_name="Payments")
billing.cert_chain_pems[0].write_to_path("billing.pem")
billing.private_key_pem.write_to_path("billing.key")
intruder = trustme.CA().issue_cert("billing.example", common_name="billing",   # another CA
                                   organization_name="Example", organization_unit_name="Payments")
intruder.cert_chain_pems[0].write_to_path("intruder.pem")
intruder.private_key_pem.write_to_path("intruder.key")

# The server: its certificate, and the CA that client certificates must chain to.
server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
server_tls.load_cert_chain("server.pem", "server.key")
server_tls.load_verify_locations("ca.pem")          # the CA of the clients' certificates
server_tls.verify_mode = ssl.CERT_REQUIRED
server = hintens.Server("tcp://127.0.0.1:0", ssl_context=server_tls,   # port 0: any free port
                        allow_subjects=["O=Example,OU=Payments,CN=billing"]).start()
address = server.addresses[0]                        # tcp://127.0.0.1:<port>

# A client: the server's CA, and its own certificate.
client_tls = ssl.create_default_context(cafile="ca.pem")   # the server's CA
client_tls.load_cert_chain("billing.pem", "billing.key")
with hintens.Client(address, ssl_context=client_tls) as client:
    print(bytes(client.request(b"charge")))                 # b'charge' (an echo server)
    print([(c.address, c.subject) for c in server.connections])

# A certificate from another CA is refused in the handshake, with the reason.
intruder_tls = ssl.create_default_context(cafile="ca.pem")
intruder_tls.load_cert_chain("intruder.pem", "intruder.key")
try:
    with hintens.Client(address, ssl_context=intruder_tls) as client:
        client.request(b"charge")
except hintens.ConnectError as error:
    print("refused:", type(error).__name__, error)
server.close()
