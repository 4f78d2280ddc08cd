export default function Home() {
  return (
    <main>
      <h1>tarabut-token-manager example</h1>
      <p>
        <code>GET /api/accounts?userId=…</code> returns that user&apos;s accounts, with a token the addon keeps valid and saved
        in the app&apos;s SQLite table.
      </p>
      <p>
        <code>DELETE /api/connection?userId=…</code> disconnects the user: their token is forgotten and their row deleted.
      </p>
    </main>
  )
}
