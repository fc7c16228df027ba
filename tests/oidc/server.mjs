// A real OAuth 2.0 authorization server for the interop tests: panva/oidc-provider
// on 127.0.0.1 with client_credentials enabled and one private_key_jwt client per
// public key given on the command line.
//
//   node server.mjs CLIENT_ID=PUBLIC_KEY.pem [CLIENT_ID=PUBLIC_KEY.pem ...]
//
// Prints "listening PORT" once it accepts connections; stops when stdin closes, so
// it never outlives the test that started it.
import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const clients = process.argv.slice(2).map((arg) => {
  const [clientId, pemPath] = arg.split('=');
  const jwk = createPublicKey(readFileSync(pemPath)).export({ format: 'jwk' });
  return {
    client_id: clientId,
    token_endpoint_auth_method: 'private_key_jwt',
    jwks: { keys: [jwk] },
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  };
});

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const provider = new Provider(`http://127.0.0.1:${port}`, {
    clients,
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
    },
    // Opaque access tokens: no resource indicator needed.
    clientAuthMethods: ['private_key_jwt'],
  });
  server.on('request', provider.callback());
  process.stdout.write(`listening ${port}\n`);
});

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
