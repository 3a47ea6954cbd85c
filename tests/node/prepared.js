// node-postgres named statements on a transaction pool of one connection: a Parse the
// server refuses, then the same statement from a second client once its table exists; a
// named statement, DISCARD ALL, then the second client's. Prints the three answers.
const { Client } = require('pg');

const config = {
  host: '127.0.0.1',
  port: Number(process.argv[2]),
  user: 'alice',
  password: 'wonder',
  database: 'postgres',
};

async function main() {
  const a = new Client(config);
  const b = new Client(config);
  await a.connect();
  await b.connect();
  const later = { name: 'later', text: 'SELECT x FROM later_node' };
  try {
    await a.query(later);
    throw new Error('the table exists already');
  } catch (e) {
    if (e.code !== '42P01') throw e;
  }
  await a.query('CREATE TABLE later_node (x int); INSERT INTO later_node VALUES (9)');
  console.log((await b.query(later)).rows[0].x);
  const plus = (v) => ({ name: 'plus', text: 'SELECT $1::int + 1 AS y', values: [v] });
  console.log((await a.query(plus(1))).rows[0].y);
  await a.query('DISCARD ALL');
  console.log((await b.query(plus(2))).rows[0].y);
  await a.end();
  await b.end();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
