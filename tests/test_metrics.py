"""Per-request bookkeeping stays off the request's path: `after_answer` records once what the
caller has already scheduled (a replica sending its result, the ingress's calls down the DAG)
has had its turn, and it does record."""

import asyncio

from deployments.metrics import after_answer


def test_after_answer_records_behind_work_already_scheduled():
    order = []

    async def send():
        order.append("sent")

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(send())  # what a handle call or a reply schedules
        after_answer(order.append, "recorded")
        await task
        turn = loop.create_future()  # resolved on a loop turn scheduled after the record's
        loop.call_soon(turn.set_result, None)
        await turn

    asyncio.run(main())
    assert order == ["sent", "recorded"]
