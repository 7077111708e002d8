// Development/demo OpenID Connect provider for ngp-research (design.md section 6).
//
//   node server.js CONFIG.json
//
// CONFIG.json is written by ngp_research.identity.devprovider.DevIdentityProvider:
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT,
//    "clients": [{"client_id", "client_secret", "redirect_uris": [...]}],
//    "users": [{"username", "password", "name", "email", "groups": [...]}],
//    "cookie_keys": [...], "jwks": {"keys": [RSA private JWK]}}
//
// Authorization code flow only, with our own login and consent pages. State (sessions, codes,
// grants) is in memory: restarting the provider logs everybody out.
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node server.js CONFIG.json');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const users = new Map(config.users.map((u) => [u.username, u]));

const log = (event, fields) => {
  const parts = Object.entries(fields).map(([k, v]) => `${k}=${JSON.stringify(String(v ?? ''))}`);
  console.log(`${new Date().toISOString()} ${event} ${parts.join(' ')}`);
};

const sameSecret = (given, expected) => {
  const a = createHash('sha256').update(String(given)).digest();
  const b = createHash('sha256').update(String(expected)).digest();
  return timingSafeEqual(a, b);
};

const provider = new Provider(config.issuer, {
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    redirect_uris: c.redirect_uris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    // Either method is accepted at the token endpoint for a client_secret_* client.
    token_endpoint_auth_method: c.token_endpoint_auth_method || 'client_secret_basic',
  })),
  async findAccount(ctx, sub) {
    const user = users.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          preferred_username: user.username,
          name: user.name,
          email: user.email,
          email_verified: true,
          groups: [...(user.groups || [])],
        };
      },
    };
  },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups'],
  // Put the scope-granted claims in the ID token too, not only at userinfo.
  conformIdTokenClaims: false,
  clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
  responseTypes: ['code'],
  pkce: { required: () => false },
  features: {
    devInteractions: { enabled: false },
    userinfo: { enabled: true },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: config.cookie_keys },
  jwks: config.jwks,
  ttl: {
    AccessToken: 60 * 60,
    AuthorizationCode: 60,
    IdToken: 60 * 60,
    Interaction: 10 * 60,
    Session: 8 * 60 * 60,
    Grant: 8 * 60 * 60,
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<p class="error">${esc(out.error)}: ${esc(out.error_description)}</p>`);
  },
});

// ---------------------------------------------------------------- pages

const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

const page = (title, body) => `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)} - NGP dev identity</title>
<style>body{font-family:sans-serif;max-width:26em;margin:4em auto}label,input,button{display:block;margin:.4em 0}
.error{color:#a00;font-weight:bold}</style></head>
<body><h1>${esc(title)}</h1>
${body}
</body></html>`;

const loginPage = (uid, clientId, { username = '', error = '' } = {}) => page('Sign in', `
<p>Signing in to <b>${esc(clientId)}</b>.</p>
${error ? `<p class="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login">
  <label>Username <input name="username" autocomplete="username" value="${esc(username)}" required autofocus></label>
  <label>Password <input name="password" type="password" autocomplete="current-password" required></label>
  <button type="submit">Sign in</button>
</form>`);

const consentPage = (uid, clientId, accountId, scopes) => page('Authorize', `
<p>Signed in as <b>${esc(accountId)}</b>.</p>
<p><b>${esc(clientId)}</b> asks for: ${scopes.map(esc).join(', ') || 'your identity'}.</p>
<form method="post" action="/interaction/${esc(uid)}/confirm">
  <button type="submit" name="decision" value="approve">Approve</button>
</form>
<form method="post" action="/interaction/${esc(uid)}/abort">
  <button type="submit" name="decision" value="deny">Deny</button>
</form>`);

// ---------------------------------------------------------------- interactions

const send = (res, status, html) => {
  res.writeHead(status, {
    'Content-Type': 'text/html; charset=utf-8',
    'Cache-Control': 'no-store',
  });
  res.end(html);
};

const readForm = async (req) => {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 64 * 1024) throw new Error('request body too large');
  }
  return new URLSearchParams(body);
};

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, page('Error', '<p class="error">This sign-in request does not match your browser session.</p>'));
    return;
  }
  const { prompt, params, session } = details;
  const clientId = params.client_id;

  if (req.method === 'GET' && !action) {
    if (prompt.name === 'login') {
      send(res, 200, loginPage(uid, clientId));
    } else {
      const scopes = prompt.details.missingOIDCScope || [];
      send(res, 200, consentPage(uid, clientId, session?.accountId, scopes));
    }
    return;
  }
  if (req.method !== 'POST') {
    send(res, 405, page('Error', '<p class="error">Method not allowed.</p>'));
    return;
  }

  const form = await readForm(req);
  if (action === 'login' && prompt.name === 'login') {
    const username = (form.get('username') || '').trim();
    const user = users.get(username);
    // Compare against a dummy secret for unknown users so both paths cost the same.
    const ok = sameSecret(form.get('password') || '', user ? user.password : '\0unknown\0') && !!user;
    if (!ok) {
      log('login-failure', { user: username, client: clientId, reason: user ? 'bad-password' : 'unknown-user' });
      send(res, 401, loginPage(uid, clientId, { username, error: 'Wrong username or password.' }));
      return;
    }
    log('login-success', { user: username, client: clientId });
    await provider.interactionFinished(req, res, { login: { accountId: username } }, { mergeWithLastSubmission: false });
    return;
  }
  if (action === 'confirm' && prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  if (action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'the user denied the request',
    }, { mergeWithLastSubmission: false });
    return;
  }
  send(res, 400, page('Error', '<p class="error">Unexpected form for this step.</p>'));
}

// ---------------------------------------------------------------- server

const oidc = provider.callback();
const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?\/?$/;

const server = http.createServer(async (req, res) => {
  const match = INTERACTION.exec(new URL(req.url, config.issuer).pathname);
  if (!match) {
    oidc(req, res);
    return;
  }
  try {
    await interaction(req, res, match[1], match[2]);
  } catch (err) {
    const expired = err instanceof errors.SessionNotFound;
    if (!expired) console.error(err);
    if (!res.headersSent) {
      send(res, 400, page('Error', `<p class="error">${expired
        ? 'This sign-in request has expired or is unknown; start again from the application.'
        : 'The sign-in request could not be processed.'}</p>`));
    }
  }
});

server.listen(config.port, '127.0.0.1', () => {
  console.log(`${new Date().toISOString()} listening issuer=${config.issuer}`);
});

const stop = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
