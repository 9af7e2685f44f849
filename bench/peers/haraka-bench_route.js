// Benchmark routing: every domain goes to the host:port in config/bench_route (the sink,
// or a closed port so that mail stays queued). Haraka's get_mx hook, answered with an MX.
'use strict'

exports.register = function () {
    const [exchange, port] = this.config.get('bench_route').split(':')
    this.mx = { exchange, port: Number(port), priority: 0 }
}

exports.hook_get_mx = function (next, hmail, domain) {
    next(OK, this.mx)
}
