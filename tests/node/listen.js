// node-postgres LISTENs on a channel and prints each notification ("payload pid"), until
// the one whose payload is the last argument; "ready" once it listens.
const { Client } = require('pg');

const [url, channel, last] = process.argv.slice(2);
const client = new Client({ connectionString: url });
setTimeout(() => {
  console.error('timed out waiting for notifications');
  process.exit(2);
}, 60000);
client.on('notification', (n) => {
  console.log(`${n.payload} ${n.processId}`);
  if (n.payload === last) {
    client.end().then(() => process.exit(0));
  }
});
client
  .connect()
  .then(() => client.query(`LISTEN ${channel}`))
  .then(() => console.log('ready'))
  .catch((e) => {
    console.error(e);
    process.exit(1);
  });
