export default function Home() {
  return (
    <main>
      <h1>tarabut-token-manager example</h1>
      <p>
        <code>GET /api/accounts?userId=…</code> returns that user&apos;s accounts, with a token kept valid by the addon.
      </p>
    </main>
  )
}
